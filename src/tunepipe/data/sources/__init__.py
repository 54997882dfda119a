"""Where rows come from: the dataset registry, file and Hub readers, formats, media."""
