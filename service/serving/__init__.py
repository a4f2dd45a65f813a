"""Using a trained model: preprocessing of raw images and top-k classification (torch, numpy, PIL)."""
