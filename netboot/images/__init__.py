"""Boot images: fetch Flatcar and Fedora CoreOS PXE kernels and initrds, verify
them, record them in ``images/manifest.json`` and carry them to offline sites.

Layout under ``images_dir``::

    manifest.json                      what is present, with sizes and digests
    flatcar/3975.2.0/flatcar_production_pxe.vmlinuz
    flatcar/3975.2.0/flatcar_production_pxe_image.cpio.gz
    flatcar/stable -> 3975.2.0         channel alias (relative symlink inside the root)
    fcos/39.20240210.3.0/...           fcos-aarch64/, flatcar-arm64/ for other arches

Profiles name images through the path (``kernel: flatcar/3975.2.0/...`` pinned,
or ``flatcar/stable/...`` to follow the last fetch of that channel).

Everything is downloaded into a staging directory *beside* images_dir (never
inside it, because HTTP and TFTP serve everything inside) and moved in only
after its digest, and its GPG signature when a keyring is given, checked out.
Anything that fails a check is deleted.
"""
