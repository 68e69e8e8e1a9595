python3 benchmarks/forward.py --device cuda --real-shape --tokens 64 256 512 1024  (H100, PYTHONPATH=., transformers 5.17, torch 2.11)
