"""Evaluation through the OpenAI API: benchmarks, the client, throughput, the matrix, and the transformers
reference."""
