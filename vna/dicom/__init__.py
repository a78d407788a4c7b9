"""Pure DICOM helpers: no I/O beyond the file objects they are handed."""
