"""Deployment tooling: the preflight and its checks, the rehearsal, the environment report, FastDeploy's wheels."""
