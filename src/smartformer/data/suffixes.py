"""File name endings of the image formats we read (a module without heavy imports)."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: File name endings that :func:`smartformer.data.io.is_volume_path` accepts as one image volume each.
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
