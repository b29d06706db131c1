"""The image world: real images between the 2D toys and SDXL, where each suspect of the paradox is a switch.

* ``data``        scikit-learn digits (offline) / an image folder / a ``.npy`` array, in [-1, 1], held-out split
* ``exact``       the exact score of the training set's empirical distribution (``toys.gmm``, zero variance)
* ``unet``        a small conv UNet; ``teachers`` its DSM training (cached) and ``UNetDenoiser``
* ``autoencoder`` a small conv KL autoencoder (the latent space, SDXL's VAE in miniature; cached)
* ``classifier``  the feature network of the Fréchet distance (cached, >= 95% held-out accuracy)
* ``lora``        zero-initialised low-rank adapters; ``students`` scratch / lora / mlp ensembles
* ``training``    shared target pools and CD / Direct CD through ``odecm.objectives``
* ``metrics``     E, FD, precision / recall, class histogram, memorisation, shrinkage spectra
* ``world``       assembling data, spaces and teachers; ``cache`` the keyed on-disk model cache

The study is ``python -m studies.image_world``; the page is ``docs/image_world.md``.
"""
