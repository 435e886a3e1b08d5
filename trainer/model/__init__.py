"""Building the model and the task: TerraTorch factories and tasks, the profile applied (fitting), multi-date encoders, model-kwargs signatures."""
