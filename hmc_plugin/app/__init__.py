"""The application: the ``hmc`` command, the end-to-end workflow, reports, data, models, training, export."""
