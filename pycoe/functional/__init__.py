"""pycoe.functional"""
