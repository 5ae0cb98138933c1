"""`shortlvlm search`: the fastest pruned model that keeps what the user needs, chosen on their data and verified
through vLLM (driver.py). space.py: the settings and the arms; splits.py: the dev and test sets; screen.py: the cheap
stage through transformers; select.py: the rules (pure); report.py: what is written."""
