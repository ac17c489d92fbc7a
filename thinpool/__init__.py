"""thinpool: thin-provisioned block device pools in the Linux dm-thin metadata format."""
