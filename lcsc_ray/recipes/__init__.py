"""Built-in MNIST recipes: data split, U-Net DDPM, consistency distillation, FID feature network, training."""
