"""The pypto kernel of ``qwen::fa_fused`` (``kernel``), its CPU replay (``replay``) and the pinned pypto 0.2.0
workarounds both rely on (``compat``). Importing this package imports no pypto."""
