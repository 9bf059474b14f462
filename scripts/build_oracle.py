"""Stage 2: build the oracle data set (states + oracle utilities) for behaviour cloning.

    python scripts/build_oracle.py                                   # tiny default
    python scripts/build_oracle.py behaviour=oracle kind=extrapolative weight=neighbours out_dir=runs/oracle/x
    torchrun --nproc_per_node 2 scripts/build_oracle.py num_images=null   # rank r builds images[r::2]

Rerunning with the same out_dir resumes (a larger num_images extends the set); a set there built
differently (kind, behaviour, seed, states_per_image, backbone weights, data, ...) is refused.
"""

from orderplan.cli import build_oracle

if __name__ == "__main__":
    build_oracle()
