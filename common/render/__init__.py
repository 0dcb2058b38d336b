"""Pure geometry for rendering (no diffusion imports): cameras, mesh IO, rasterisation, texture projection,
panoramas and 3D Gaussians. Import the submodules directly; this package imports nothing heavy on purpose."""
