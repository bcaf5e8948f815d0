"""hvcpolicy: firmware-feature policy for arm64 KVM guests run by QEMU under libvirt."""

__version__ = "0.1.0"

# The libvirt metadata namespace (SPEC.md section 4).
XMLNS = "https://hvcpolicy.dev/xmlns/libvirt/1"
