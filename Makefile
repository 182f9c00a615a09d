# lowbit: `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch on this machine; a GPU user sets TORCH= to keep the torch they have.
TORCH  ?= torch==2.13.0
MODEL  ?= smollm2-135m
OUT    ?= out/smollm2-w4g128

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/lowbit quantize $(MODEL) $(OUT) --method rtn --bits 4 --group-size 128 --sym --force
	$(BIN)/lowbit inspect $(OUT) | tail -n 3
	$(BIN)/lowbit eval $(OUT) --base $(MODEL) --limit-tokens 8192
	$(BIN)/lowbit generate $(OUT) --chat --max-new-tokens 48 --prompt "Explain in one sentence why the sky is blue."

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/rtn_table.py --limit-tokens 32768

clean:
	rm -rf $(VENV) out
