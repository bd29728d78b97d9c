"""The application: configs, the builder, the run layer (the recipe), the CLI, deployment and reports."""
