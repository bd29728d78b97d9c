"""The method: spaces, costs, estimators, surrogates, the BlackBox op and the meta-solver network.

Nothing here knows about configs, run directories or the command line (`metasolve.app`), nor
about the training loop (`metasolve.training`)."""
