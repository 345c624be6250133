"""The research target: the fixed harness (prepare.py) and the baseline train.py the swarm evolves."""
