"""The dashboard's pages: Streamlit scripts that apps/dashboard.py runs through st.navigation."""
