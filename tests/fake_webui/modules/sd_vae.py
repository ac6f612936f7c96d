"""modules.sd_vae: the external VAE file in use, if any."""

loaded_vae_file = None
base_vae = None
