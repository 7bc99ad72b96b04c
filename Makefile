# Thin aliases for the README commands.
.PHONY: bench test clean
bench:
	python3 scripts/run.py bench
test:
	python3 scripts/run.py test
clean:
	rm -rf .venv build *.egg-info
