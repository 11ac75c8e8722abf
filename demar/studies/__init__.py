"""Optuna studies over training and sampling knobs, tracked in MLflow.

A study is a YAML file (``studies/<name>.yaml``): the search space as data, a seeded
sampler, a pruner, the number of trials, the row of ``params.yaml`` every trial
starts from and the trial's budget. The package, one job per module:

* :mod:`~demar.studies.config`: the study file's schema.
* :mod:`~demar.studies.base`: the row's configs a trial starts from, and its overrides.
* :mod:`~demar.studies.search`: the per-trial seeded sampler and the pruner.
* :mod:`~demar.studies.objectives`: the named objectives (``training``, ``sampling``),
  calling the same library functions as the DVC stages.
* :mod:`~demar.studies.identity`: the config and code digest a study is stored under.
* :mod:`~demar.studies.storage`: the Optuna storage and the trials of dead workers.
* :mod:`~demar.studies.runner`: workers, trials and their MLflow runs.
* :mod:`~demar.studies.report`: plots, trial table and best trials.
* :mod:`~demar.studies.cli`: ``demar study run|report``.

This file imports none of them, so the code digest of the objectives does not
depend on the runner, the report or the command line.
"""
