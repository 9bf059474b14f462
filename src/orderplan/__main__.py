"""`python -m orderplan JOB key=value ...`: run one of the jobs listed in `orderplan.cli`."""

from orderplan.cli import dispatch

if __name__ == "__main__":
    dispatch()
