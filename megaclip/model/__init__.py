from megaclip.model.clip import CLIPModel  # noqa: F401
