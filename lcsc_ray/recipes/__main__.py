"""`python -m lcsc_ray.recipes train-ddpm --out outputs/mnist-ddpm`."""

from lcsc_ray.recipes.cli import main

if __name__ == "__main__":
    main()
