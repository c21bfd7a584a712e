"""Training: the loop, its losses, optimizers, schedulers, early stopping and seeding."""
