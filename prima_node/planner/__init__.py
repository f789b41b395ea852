"""Planning a cluster: what a model costs (model_profile), what each device can do, and Halda,
which assigns layer windows to devices."""
