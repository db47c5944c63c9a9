"""Compile every Triton kernel of the triton backend for an sm_90 GPU, without one: Triton's compiler and its
bundled ptxas run on the CPU. The interpreter accepts code the compiler rejects (a non-constexpr global, a
loop-carried type change); this is what catches it here. Run as a script, without TRITON_INTERPRET: prints
one line per kernel variant, "OK" or "FAIL <error>"."""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagedserve.attention import triton_kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, types: dict, consts: dict, label: str) -> bool:
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = types[name]
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
    except Exception as e:  # noqa: BLE001 - reported, the test reads the line
        print(label, "FAIL", type(e).__name__, str(e)[-400:].replace("\n", " "))
        return False
    print(label, "OK")
    return True


def main() -> int:
    ok = True
    for dt in ("bf16", "fp16", "fp32"):
        p, i32 = "*" + dt, "i32"
        prec = "ieee" if dt == "fp32" else "tf32"
        ok &= compile_one(K.write_kv, dict(k_ptr=p, v_ptr=p, k_cache_ptr=p, v_cache_ptr=p, slot_ptr="*i64",
                                           stride_kt=i32, stride_kh=i32, stride_vt=i32, stride_vh=i32),
                          dict(HEAD_DIM=128, ROW=1024, ROW_P=1024), f"write_kv {dt}")
        attn = dict(k_cache_ptr=p, v_cache_ptr=p, tables_ptr="*i64", seq_lens_ptr="*i64", scale_log2="fp32",
                    stride_qt=i32, stride_qh=i32, stride_tab=i32, stride_cb=i32, stride_co=i32, stride_ch=i32)
        for g, block_m, tile_n, d in ((4, 16, 64, 128), (3, 64, 32, 64)):
            ok &= compile_one(K.varlen_attention,
                              dict(attn, out_ptr=p, q_ptr=p, qsl_ptr="*i64", first_seq=i32, end_seq=i32,
                                   stride_ot=i32, stride_oh=i32),
                              dict(G=g, BLOCK_Q=block_m // g, BLOCK_M=block_m, BLOCK_SIZE=16, TILE_N=tile_n,
                                   HEAD_DIM=d, HEAD_DIM_P=d, DOT_PRECISION=prec, DOT_F32=False),
                              f"varlen_attention {dt} G={g} BLOCK_M={block_m}")
        ok &= compile_one(K.decode_split, dict(attn, part_acc_ptr="*fp32", part_ml_ptr="*fp32", q_ptr=p),
                          dict(NUM_HEADS=32, NUM_SPLITS=8, G=4, BLOCK_M=16, BLOCK_SIZE=16, TILE_N=64, HEAD_DIM=128,
                               HEAD_DIM_P=128, DOT_PRECISION=prec, DOT_F32=False), f"decode_split {dt}")
        ok &= compile_one(K.merge_splits, dict(out_ptr=p, part_acc_ptr="*fp32", part_ml_ptr="*fp32", stride_ot=i32,
                                               stride_oh=i32),
                          dict(NUM_HEADS=32, NUM_SPLITS=8, SPLITS_P=8, HEAD_DIM=128, HEAD_DIM_P=128),
                          f"merge_splits {dt}")
    # Head dims that are no power of two (padded to 128 inside the kernels, masked).
    p, i32 = "*bf16", "i32"
    attn = dict(k_cache_ptr=p, v_cache_ptr=p, tables_ptr="*i64", seq_lens_ptr="*i64", scale_log2="fp32",
                stride_qt=i32, stride_qh=i32, stride_tab=i32, stride_cb=i32, stride_co=i32, stride_ch=i32)
    ok &= compile_one(K.varlen_attention, dict(attn, out_ptr=p, q_ptr=p, qsl_ptr="*i64", first_seq=i32, end_seq=i32,
                                               stride_ot=i32, stride_oh=i32),
                      dict(G=4, BLOCK_Q=4, BLOCK_M=16, BLOCK_SIZE=16, TILE_N=64, HEAD_DIM=80, HEAD_DIM_P=128,
                           DOT_PRECISION="tf32", DOT_F32=False), "varlen_attention bf16 head_dim 80")
    ok &= compile_one(K.decode_split, dict(attn, part_acc_ptr="*fp32", part_ml_ptr="*fp32", q_ptr=p),
                      dict(NUM_HEADS=32, NUM_SPLITS=4, G=4, BLOCK_M=16, BLOCK_SIZE=32, TILE_N=64, HEAD_DIM=96,
                           HEAD_DIM_P=128, DOT_PRECISION="tf32", DOT_F32=False), "decode_split bf16 head_dim 96")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
