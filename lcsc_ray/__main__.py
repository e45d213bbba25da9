"""`python -m lcsc_ray`."""

from lcsc_ray.cli import main

if __name__ == "__main__":
    main()
