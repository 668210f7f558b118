"""Interoperability with other looped-model code: Parcae checkpoint import (parcae.py), Hugging Face
transformers classes and export (hf.py)."""
