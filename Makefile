# The two commands a user needs: `make run EXP=experiments/NAME.toml` and `make test`.
# Both create the virtual environment, install imgcls and fetch the demo data on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXP    ?= experiments/scratch_cnn.toml
ARGS   ?=

.PHONY: run test spec bench reference data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[demo,test,export]'
	touch $@

data/groceries/train: | $(STAMP)
	$(BIN)/python -m imgcls.datasets groceries data/groceries

data: data/groceries/train

run: $(STAMP) data/groceries/train
	$(BIN)/python -m imgcls.run $(EXP) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest spec tests -q -p no:cacheprovider

spec: $(STAMP)
	$(BIN)/python -m pytest spec -q

bench: $(STAMP)
	$(BIN)/python -m bench

reference: $(STAMP)
	$(BIN)/python -m imgcls.config --reference

clean:
	rm -rf $(VENV) data runs
