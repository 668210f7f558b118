"""Interoperability with other looped-model code: Parcae checkpoint import (Hugging Face export comes later)."""
