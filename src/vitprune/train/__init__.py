"""Training support for learned token selectors (HeatViT/SPViT): the latency look-up table they train against
(``lut``), and — added with the selectors — their losses and training loop."""
