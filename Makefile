# pairforge: `make demo` sets up and runs the demo job, `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup demo test test-fast bench-cpu lint docs clean

setup: $(VENV)/.installed /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz /usr/bin/chromium \
       $(VENV)/share/pairforge/wordnet_entries.txt

# torch first, pinned, so pip does not fetch another build; then the project with its test, safety and docs extras
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,safety,docs]'
	# the text detector's model file only: its own requirement opencv-python would clash with
	# opencv-python-headless (pyproject.toml, the safety extra, says more)
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	touch $@

# real product photos for the demo and the tests (Debian's dataset-fashion-mnist, MIT)
/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

# metadata_match's offline default entries (entries: wordnet), built from Debian's WordNet into the venv
$(VENV)/share/pairforge/wordnet_entries.txt: $(VENV)/.installed /usr/share/wordnet/data.noun scripts/build_wordnet_entries.py
	$(PY) scripts/build_wordnet_entries.py --out $@

/usr/share/wordnet/data.noun:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet

# a headless browser: tests/manifests/test_report.py loads `pairforge report`'s page in it (Debian's chromium)
/usr/bin/chromium:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: setup
	$(VENV)/bin/pairforge demo --out demo_out
	$(VENV)/bin/pairforge manifest verify demo_out/run

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check pipeline manifests

# the docs site into site/ (tests/test_docs.py builds it too)
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf demo_out build site *.egg-info .pytest_cache
