# The two commands of the README: `make demo` (main job) and `make test`. Both set up first.
.PHONY: setup demo test lint

setup:
	./setup.sh

demo: setup
	.venv/bin/shortlvlm demo

test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check shortlvlm_vllm tests serve eval
