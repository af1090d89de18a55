"""Training RTMDet in detdeploy: datasets, augmentation, the training loop, EMA and schedules."""
