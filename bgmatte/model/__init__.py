"""The networks: encoders, ASPP, decoder and refiner, assembled in `matting.py`; `build.py` loads checkpoints."""
