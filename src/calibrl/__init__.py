"""calibrl: CalibRL (ICLR 2026) hybrid-policy RLVR as a drop-in TRL trainer.

`CalibRLConfig` / `CalibRLTrainer` are imported lazily: `import calibrl` stays cheap (no TRL import)
so the pure-math, task and reward modules can be used on their own.
"""

__version__ = "0.1.0"

__all__ = ["CalibRLConfig", "CalibRLTrainer", "__version__"]


def __getattr__(name):
    if name == "CalibRLConfig":
        from calibrl.config import CalibRLConfig

        return CalibRLConfig
    if name == "CalibRLTrainer":
        from calibrl.trainer import CalibRLTrainer

        return CalibRLTrainer
    raise AttributeError(f"module 'calibrl' has no attribute {name!r}")
