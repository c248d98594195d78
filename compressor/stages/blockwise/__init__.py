"""The block-by-block walk calibrated stages share: sequential calibration (each block on the outputs of
the blocks already compressed, mixture-of-experts routing included), where activations are held
(memory or disk), and layer-by-layer execution for models larger than memory."""
