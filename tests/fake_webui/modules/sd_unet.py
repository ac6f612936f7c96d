"""modules.sd_unet: an extension-provided UNet replacement (TensorRT-style) when `current_unet` is set."""

current_unet_option = None
current_unet = None
