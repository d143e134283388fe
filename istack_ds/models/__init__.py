"""Teacher (frozen SFM), student (HF HubertModel + distillation heads) and the losses."""
