"""The ``handlens`` command: a thin shell over library functions. Heavy imports happen inside commands."""
