"""The audit log's hash chain and `pagedserve audit verify`: an untouched log passes; an edited, inserted,
deleted or reordered line, a cut-off or extended tail, and a head rewritten without the key are each found."""
import json

import pytest

from pagedserve.cli import main
from pagedserve.server.audit import AuditLog, new_record, verify_chain

KEY = b"audit-secret"


@pytest.fixture
def log(tmp_path):
    """A log of 6 records written by two server runs (the second continues the chain); its lines."""
    path = tmp_path / "audit.jsonl"
    for run in range(2):
        audit = AuditLog(str(path), KEY)
        for i in range(3):
            rec = new_record("/v1/completions")
            rec.update(identity=f"tenant-{i}", status_code=200, completion_tokens=10 * run + i)
            audit.write(rec)
        audit.close()
    return path


def lines(path):
    return path.read_text().splitlines(keepends=True)


def verify(path, key=KEY):
    return verify_chain([str(path)], key)


def test_an_untouched_log_passes_and_continues_across_restarts(log, capsys):
    records = [json.loads(line) for line in lines(log)]
    assert [r["seq"] for r in records] == list(range(6)) and records[0]["prev"] == "0" * 64
    assert verify(log) == (6, [])
    key_file = log.parent / "key"
    key_file.write_bytes(KEY + b"\n")
    assert main(["audit", "verify", str(log), "--key-file", str(key_file)]) == 0
    assert "ok: 6 lines" in capsys.readouterr().out


@pytest.mark.parametrize("tamper,found", [
    ("edit", "audit.jsonl:4: its prev is not the hash of the line before it: line 3 was edited"),
    ("delete", "audit.jsonl:3: seq 3 where 2 was due: lines missing"),
    ("swap", "audit.jsonl:3: seq 3 where 2 was due"),
    ("insert", "audit.jsonl:4: its prev is not the hash of the line before it: line 3 was edited, or this line "
               "inserted"),
    ("insert_forged", "audit.jsonl:5: seq 3 where 4 was due: lines out of order or inserted"),
    ("truncate", "the log ends at seq 4 but its head says 5: the tail was cut off"),
    ("append", "the log's last line is not the one its head names"),
    ("edit_last", "the log's last line is not the one its head names"),
    ("first", "audit.jsonl:1: seq 1 where 0 was due: lines missing"),
])
def test_each_kind_of_tampering_is_found(log, tamper, found, capsys):
    text = lines(log)
    if tamper == "edit":  # a tenant's token count lowered
        text[2] = text[2].replace('"completion_tokens": 2', '"completion_tokens": 1')
    elif tamper == "delete":
        del text[2]
    elif tamper == "swap":
        text[2], text[3] = text[3], text[2]
    elif tamper == "insert":  # a copy of line 3, as if a request had been made twice
        text.insert(3, text[2].replace('"seq": 2', '"seq": 3'))
    elif tamper == "insert_forged":  # a new line chained onto line 3 by someone who knows the format
        from pagedserve.server.audit import line_hash
        forged = json.loads(text[2])
        forged.update(seq=3, prev=line_hash(text[2].rstrip("\n")), identity="tenant-9")
        text.insert(3, json.dumps(forged) + "\n")
    elif tamper == "truncate":
        del text[-1]
    elif tamper == "append":  # a well-formed line chained onto the last one, after the server wrote its head
        from pagedserve.server.audit import line_hash
        forged = json.loads(text[-1])
        forged.update(seq=6, prev=line_hash(text[-1].rstrip("\n")))
        text.append(json.dumps(forged) + "\n")
    elif tamper == "edit_last":
        text[-1] = text[-1].replace('"tenant-2"', '"tenant-0"')
    elif tamper == "first":
        del text[0]
    log.write_text("".join(text))
    total, problems = verify(log)
    assert problems and found in problems[0], problems
    assert main(["audit", "verify", str(log)]) == 1
    assert found in capsys.readouterr().out


def test_a_head_rewritten_without_the_key_is_found(log):
    head = log.parent / "audit.jsonl.head"
    text = lines(log)[:-1]  # the tail cut, and the head rewritten to match it
    log.write_text("".join(text))
    from pagedserve.server.audit import head_record, line_hash
    last = json.loads(text[-1])
    head.write_text(json.dumps(head_record(last["seq"], line_hash(text[-1].rstrip("\n")), b"a guess")))
    assert "HMAC does not match" in verify(log)[1][0]
    assert verify(log, key=None) == (5, [])  # without the key only the chain is checked: it holds
    head.unlink()
    assert "head is missing" in verify(log, key=None)[1][0]


def test_audit_summary_per_identity_and_window(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"time": "2026-12-05T10:00:05+00:00", "identity": "alice", "status_code": 200, "prompt_tokens": 10,
         "completion_tokens": 5, "latency_s": 1.0},
        {"time": "2026-12-05T10:00:50+00:00", "identity": "alice", "status_code": 429, "prompt_tokens": 0,
         "completion_tokens": 0, "latency_s": 0.0},
        {"time": "2026-12-05T10:01:10+00:00", "identity": "bob", "status_code": 500, "prompt_tokens": 7,
         "completion_tokens": 0, "latency_s": 2.0},
        {"time": "2026-12-05T10:01:20+00:00", "identity": "alice", "status_code": 200, "prompt_tokens": 1,
         "completion_tokens": 2, "latency_s": 3.0},
    ]) + "not json\n")
    from pagedserve.server.audit import summarize
    whole = {r["identity"]: r for r in summarize([str(path)])}
    assert whole["alice"] == {"window_start": None, "identity": "alice", "requests": 3, "denied": 1, "errors": 0,
                              "prompt_tokens": 11, "completion_tokens": 7, "latency_max_s": 3.0,
                              "latency_mean_s": pytest.approx(4 / 3)}
    assert whole["bob"]["errors"] == 1 and whole["bob"]["requests"] == 1
    by_minute = summarize([str(path)], 60)
    assert [(r["identity"], r["requests"]) for r in by_minute] == [("alice", 2), ("alice", 1), ("bob", 1)]
    assert main(["audit", "summary", str(path), "--window", "1"]) == 0
    out = capsys.readouterr().out
    assert "2026-12-05 10:00" in out and "2026-12-05 10:01" in out and "bob" in out


def test_rotation_keeps_the_chain_across_files(tmp_path):
    """logrotate moves the file, then SIGHUP reopens the path: the new file goes on with the chain."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), KEY)
    for _ in range(3):
        audit.write(new_record("/v1/completions"))
    path.rename(tmp_path / "audit.jsonl.1")
    audit.reopen()
    for _ in range(2):
        audit.write(new_record("/v1/chat/completions"))
    audit.close()
    assert [json.loads(x)["seq"] for x in lines(path)] == [3, 4]
    assert verify_chain([str(tmp_path / "audit.jsonl.1"), str(path)], KEY) == (5, [])
    _, problems = verify_chain([str(path)], KEY)  # the new file alone: its first lines are elsewhere
    assert "continues another" in problems[0]
    old = lines(tmp_path / "audit.jsonl.1")
    (tmp_path / "audit.jsonl.1").write_text("".join(old[:-1]))  # the rotated file's last line removed
    assert "seq 3 where 2 was due" in verify_chain([str(tmp_path / "audit.jsonl.1"), str(path)], KEY)[1][0]


def test_an_identity_far_above_its_own_baseline_is_flagged_once_per_window():
    from pagedserve.server.anomaly import AnomalyDetector
    now = [0.0]
    d = AnomalyDetector(window_s=60, factor=10, min_tokens=1000, history=10, clock=lambda: now[0])
    for minute in range(5):  # a steady 200 tokens a minute
        now[0] = minute * 60 + 1
        assert d.observe("alice", 200) is None
        assert d.observe("bob", 5000) is None  # bob's steady rate is high: his own baseline, not alice's
    now[0] = 5 * 60 + 1
    assert d.observe("alice", 1500) is None  # 1,500 <= 10 x 200
    found = d.observe("alice", 600)          # 2,100 > 2,000
    assert found == {"identity": "alice", "window_start": 300.0, "window_s": 60, "tokens": 2100,
                     "baseline_tokens": 200.0, "factor": 10}
    assert d.observe("alice", 5000) is None  # one record per window
    assert d.observe("bob", 5000) is None
    now[0] = 100 * 60  # quiet minutes pull alice's baseline down; a first burst after them is flagged
    assert d.observe("alice", 1000) is not None
    assert AnomalyDetector(clock=lambda: 0.0).observe("new", 10**6) is None  # no baseline yet
