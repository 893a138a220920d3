"""The testbed: a small CLIP that prtool trains itself on Cluttered Fashion-MNIST."""
