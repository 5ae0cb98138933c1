"""Serving with vLLM: the server launcher, visual-token selection and the plugin's registered model classes."""
