# The two commands a newcomer needs (see README):
#   make demo   create .venv, install everything, generate Turkish text with the embedded default model
#   make test   run the whole test suite (installs first when .venv is missing)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench

$(PY):
	bash scripts/setup.sh

install:
	bash scripts/setup.sh

demo: install
	$(VENV)/bin/diffutron generate "Türkiye'nin başkenti neresidir?"

test: $(PY)
	$(PY) -m pytest
