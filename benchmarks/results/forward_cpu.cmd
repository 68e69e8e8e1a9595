python benchmarks/forward.py --reps 15 --json benchmarks/results/forward_cpu.json   (2-core CPU VM, quiet machine)
