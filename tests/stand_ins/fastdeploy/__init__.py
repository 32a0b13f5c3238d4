"""A stand-in for FastDeploy (tests/stand_ins/README.md): not FastDeploy, never shipped."""

__version__ = "0.0.0+standin"
