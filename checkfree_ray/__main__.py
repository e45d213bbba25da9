"""`python -m checkfree_ray`."""

from checkfree_ray.cli import main

if __name__ == "__main__":
    main()
