# Two commands do all the set-up: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: test test-fast lint demo app browser venv clean

# what running needs (requirements.txt); the test tools come on top (requirements-dev.txt)
venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

$(DEV): $(STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(DEV)

test: $(DEV) browser
	$(PY) -m pytest -q tests

# the unit tests alone (no subprocesses, no browser, nothing slow): docs/tests.md
test-fast: $(DEV)
	$(PY) -m pytest -q tests -m "not slow and not subprocess and not browser"

lint: $(DEV)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash demo.sh

# The inspection page with the demo's checkpoint (after `make demo`); T starts near the demo's
# calibrated thresholds (docs/app.md).
app: $(STAMP)
	$(PY) app.py --checkpoint_path demo_output/checkpoints/epoch_12_group_id_2.pth \
	    --pretrained_path demo_output/clip_demo.pt --threshold 0.05

# Headless Chromium and its driver for the page's browser test: Debian's packages, installed when
# missing and this is root on apt; elsewhere the test is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        chromium chromium-driver >/dev/null || echo "could not install chromium"; \
	else echo "no chromium/chromedriver (and not root on apt): the browser test will be skipped"; fi

clean:
	rm -rf $(VENV) demo_output
